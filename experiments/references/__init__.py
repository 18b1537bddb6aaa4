"""The peer libraries the tests and benchmarks measure against (OpenAI's CLIP, open_clip,
clip_benchmark), installed on first use and imported from here: tests/ and experiments/ import
them, never the reverse."""
