"""The built-in offline task behind `preftune demo`."""
