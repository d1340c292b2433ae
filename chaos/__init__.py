"""The chaos suite: seeded scenarios that throw crashes, Azure faults, outside actors, storage
faults, races and bad events at the real stack and check every invariant after every step.

Run it with `make chaos` or `python -m chaos --seed N --scenarios S`; see docs/safety.md.
"""
