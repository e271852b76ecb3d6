from qcompile.cli import entry

entry()
