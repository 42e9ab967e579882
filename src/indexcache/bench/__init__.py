"""`indexcache bench`: what a pattern saves, timed through the product's own path."""
