"""Per-key limits: requests per minute, concurrency and spend (`quota`), over slots held in this
process or shared through Redis."""
