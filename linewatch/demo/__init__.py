"""`linewatch demo`: the whole pipeline on built-in images, for a first look (torch, through subprocesses)."""
