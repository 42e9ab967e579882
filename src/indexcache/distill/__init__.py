"""`indexcache distill`: train each F indexer on the attention of the layers it serves."""
