"""What more than one test module, benchmark or fuzz script uses: session fixtures, the Wine host and the
agent, packages built with the model, native builds, the fuzz harnesses, real binaries, trains, signing keys.
Test modules import from here, never from one another (tests/test_test_imports.py)."""
