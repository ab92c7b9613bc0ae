//go:build race

package agent

// raceEnabled is set when the tests run under the race detector, which
// slows everything down several times: latency bounds are widened.
const raceEnabled = true
