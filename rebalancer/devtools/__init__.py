"""Local development tools: emulators the tests and the demo start on loopback."""
