"""The command line: every parser and command. The library never imports this package."""
