"""The cluster planner (``longreach plan``): an analytic step-time and memory model per rank.

* :mod:`longreach.planning.hardware` — device profiles (FLOP/s, bandwidths, memory) and the machine's
  own description for benchmark records.
* :mod:`longreach.planning.costmodel` — compute, communication and memory per rank of one training
  step, for a model shape, sequence length and parallel degrees; the one memory model that
  ``longreach plan`` and ``longreach launch --validate`` (the dry run) both use.
* :mod:`longreach.planning.plan` — enumerates parallel degrees, ranks them by predicted step time,
  and calibrates a profile against measured ``longreach bench sweep`` records.
"""
