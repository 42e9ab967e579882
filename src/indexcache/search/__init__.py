"""The greedy search (`greedy`), how candidates are scored (`scoring`), and the overlap strategy."""
