package bridge

import (
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

// Quota bounds what one VM instance may put into the shared log, so that a
// guest that floods cannot fill the disk, grow everyone's evidence without
// bound, or take the committer from the other VMs. A field left at zero
// takes its default (DefaultQuota); a negative field means unlimited.
//
// Rates are token buckets: a guest may send a burst at once (a boot logs a
// few thousand entries in a second), then the bucket refills at the rate.
// An over-rate guest is not refused: it is told so once per episode (a
// non-fatal protocol error, code "quota"), the episode is noted by an
// action record in its own log, and the bridge stops reading from it until
// the bucket has refilled, which slows it through its own transport. No
// record is ever dropped. An oversize entry and the record limit per VM
// instance are refused with a fatal error that names the limit: the guest
// keeps those entries, nothing is acknowledged for them.
type Quota struct {
	// RecordsPerSecond is the sustained rate of guest records.
	RecordsPerSecond float64
	// RecordBurst is how many records may arrive at once.
	RecordBurst float64
	// BytesPerSecond is the sustained rate of entry bytes (template data,
	// template hash and template name).
	BytesPerSecond float64
	// ByteBurst is how many entry bytes may arrive at once.
	ByteBurst float64
	// MaxEntryBytes bounds one entry's template data.
	MaxEntryBytes int
	// MaxRecords bounds the records of one VM instance (all kinds, the
	// genesis included); a restarted VM is a new instance.
	MaxRecords int64
}

// Defaults of Quota, fitted to real IMA logs: the real guest list in
// internal/ima/testdata (454 ima-sig entries, every file signed) has
// template data of 197 bytes on average and 366 at most. An ima-sig entry
// is at most a digest, a path (PATH_MAX, 4 KiB) and a signature (512 bytes
// for RSA-4096; 4.6 KiB for ML-DSA-87), under 9 KiB: DefaultMaxEntryBytes
// leaves room for that. Hosts whose guests log ima-buf key payloads
// (KEY_CHECK, up to 1 MiB) raise it. A boot with a broad policy logs a few
// thousand entries within seconds; the record burst takes ten such boots
// unslowed, the byte burst as many entries of 640 bytes, and the sustained
// rates are about a hundred times what a busy guest logs at run time while
// keeping one VM to a few percent of a host's commit throughput (P1:
// 200k records/s). The record limit per instance is a hundred times a
// large real log, about 200 MB of records at the average size.
const (
	DefaultRecordsPerSecond = 2000
	DefaultRecordBurst      = 50000
	DefaultBytesPerSecond   = 1 << 20
	DefaultByteBurst        = 32 << 20
	DefaultMaxEntryBytes    = 16 << 10
	DefaultMaxRecords       = 1 << 20
)

// Unlimited is a Quota that bounds nothing but the protocol's own limits
// (benchmarks and tests of raw throughput).
var Unlimited = Quota{RecordsPerSecond: -1, RecordBurst: -1, BytesPerSecond: -1, ByteBurst: -1, MaxEntryBytes: -1, MaxRecords: -1}

// withDefaults fills zero fields.
func (q Quota) withDefaults() Quota {
	def := func(v *float64, d float64) {
		if *v == 0 {
			*v = d
		}
	}
	def(&q.RecordsPerSecond, DefaultRecordsPerSecond)
	def(&q.RecordBurst, DefaultRecordBurst)
	def(&q.BytesPerSecond, DefaultBytesPerSecond)
	def(&q.ByteBurst, DefaultByteBurst)
	if q.MaxEntryBytes == 0 {
		q.MaxEntryBytes = DefaultMaxEntryBytes
	}
	if q.MaxRecords == 0 {
		q.MaxRecords = DefaultMaxRecords
	}
	return q
}

// bucket is a token bucket that may go into debt: a frame larger than what
// is left is admitted at once and its debt is paid by waiting, so no frame
// is ever refused for its size alone.
type bucket struct {
	rate, burst float64 // rate ≤ 0: unlimited
	tokens      float64
	last        time.Time
}

func newBucket(rate, burst float64, now time.Time) bucket {
	if burst <= 0 {
		burst = math.Max(rate, 1)
	}
	return bucket{rate: rate, burst: burst, tokens: burst, last: now}
}

// take takes n tokens and returns how long the caller must wait before the
// bucket is out of debt.
func (b *bucket) take(n float64, now time.Time) time.Duration {
	if b.rate <= 0 {
		return 0
	}
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = math.Min(b.burst, b.tokens+dt.Seconds()*b.rate)
	}
	b.last = now
	b.tokens -= n
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / b.rate * float64(time.Second))
}

// vmQuota is one VM instance's quota state. It outlives its sessions, so a
// guest cannot refill its buckets by reconnecting.
type vmQuota struct {
	mu      sync.Mutex
	records bucket
	bytes   bucket
	// slowed is true during an over-rate episode: it starts when a frame
	// has to wait and ends when one is admitted without waiting.
	slowed bool
	// capped is set once the record limit has been noted in the log.
	capped bool
	// episodes counts over-rate episodes (tests, metrics).
	episodes int
}

// quotaFor returns VM id's quota state, creating it.
func (b *Bridge) quotaFor(id conceal.Digest) *vmQuota {
	b.quotaMu.Lock()
	defer b.quotaMu.Unlock()
	if b.quotas == nil {
		b.quotas = make(map[conceal.Digest]*vmQuota)
	}
	q, ok := b.quotas[id]
	if !ok {
		qc := b.quota()
		now := b.now()
		q = &vmQuota{records: newBucket(qc.RecordsPerSecond, qc.RecordBurst, now), bytes: newBucket(qc.BytesPerSecond, qc.ByteBurst, now)}
		b.quotas[id] = q
	}
	return q
}

// forgetQuota drops an ended VM's quota state.
func (b *Bridge) forgetQuota(id conceal.Digest) {
	b.quotaMu.Lock()
	delete(b.quotas, id)
	b.quotaMu.Unlock()
}

// quota returns the effective quota.
func (b *Bridge) quota() Quota { return b.Quota.withDefaults() }

// admission is what the quota says about one frame.
type admission struct {
	wait time.Duration // how long to stop reading from the guest
	// episode is set on the first over-rate frame of an episode: the
	// guest is told, and an action record notes it.
	episode string
}

// admit charges a frame of n records and size bytes to the VM's buckets.
func (q *vmQuota) admit(qc Quota, n int, size int, now time.Time) admission {
	q.mu.Lock()
	defer q.mu.Unlock()
	wr := q.records.take(float64(n), now)
	wb := q.bytes.take(float64(size), now)
	a := admission{wait: max(wr, wb)}
	if a.wait == 0 {
		q.slowed = false
		return a
	}
	if !q.slowed {
		q.slowed = true
		which := fmt.Sprintf("%.0f records/s (burst %.0f)", qc.RecordsPerSecond, qc.RecordBurst)
		if wb > wr {
			which = fmt.Sprintf("%.0f bytes/s (burst %.0f)", qc.BytesPerSecond, qc.ByteBurst)
		}
		a.episode = fmt.Sprintf("over the per-VM quota of %s: the bridge reads this VM's frames more slowly until it is back under it; nothing is dropped (bridge quota settings)", which)
	}
	return a
}
