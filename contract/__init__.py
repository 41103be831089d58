"""The contract every folder shares, depending on nothing else of ours.

Today: the error types (`errors.py`) that every layer raises and the CLI and server turn into
exit codes and HTTP answers. Devices, runtime, quantize, export and serve all import from here,
never from each other for these (tests/test_borders.py keeps it so).
"""
