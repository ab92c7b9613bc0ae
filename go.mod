module github.com/tpmmux/tpmmux

go 1.26

require (
	github.com/fxamacker/cbor/v2 v2.10.0
	github.com/google/go-tpm v0.9.8
	github.com/google/go-tpm-tools v0.4.11
	go.etcd.io/bbolt v1.5.0
	libvirt.org/go/libvirtxml v1.12008.0
)

require (
	github.com/x448/float16 v0.8.4 // indirect
	golang.org/x/sys v0.45.0 // indirect
)
