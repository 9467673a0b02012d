"""The `lorasum` command line: parsing, the command functions, and what they print."""
