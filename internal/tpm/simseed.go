package tpm

// DefaultSimSeed seeds the simulator's hierarchy seeds when the spec is plain
// "sim". A fixed seed makes the simulator's AK the same key in every process
// and across Close/Open, as a hardware TPM's AK is the same after a reboot,
// so a demo verifier can pin it. It also means the sim AK's private key is
// public knowledge: the simulator proves nothing to a remote party, and only
// "swtpm" and "device" have secret seeds.
const DefaultSimSeed = 0x74706d6d7578 // "tpmmux"
