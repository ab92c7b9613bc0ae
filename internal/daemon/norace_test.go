//go:build !race

package daemon

// raceEnabled is set when the tests run under the race detector.
const raceEnabled = false
