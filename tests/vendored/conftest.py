# Vendored framework files are loaded by the tests that use them (see README.md), not
# collected on their own.
collect_ignore_glob = ["*"]
