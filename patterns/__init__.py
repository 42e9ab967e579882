"""F/S sharing patterns and the pattern file that `indexcache search` writes."""
