"""Maintainer scripts: run from a source checkout, never imported by the library and not in the
wheel (setup.cfg excludes this package). `prepare_demo_data` rebuilds `uniperceiver/demo/data`."""
