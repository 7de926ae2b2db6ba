"""`make bench`: latency tables. Prints numbers; never asserts them."""
