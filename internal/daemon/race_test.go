//go:build race

package daemon

// raceEnabled is set when the tests run under the race detector, which
// slows everything down several times: timing bounds are not checked.
const raceEnabled = true
