//go:build !race

package agent

// raceEnabled is set when the tests run under the race detector.
const raceEnabled = false
