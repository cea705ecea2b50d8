"""``namm bench``: inference speed and memory of every method on one model, against the full cache
and plain transformers, with the performance targets judged pass / miss.

* :mod:`namm.bench.run`: the configuration and the loop over lengths and methods;
* :mod:`namm.bench.measure`: one prefill (+ decoding) measurement, peak RSS sampling;
* :mod:`namm.bench.dtype`: the keep-all error and speed of a reduced-precision run;
* :mod:`namm.bench.targets`: the targets and the peak-KV bound of the schedule;
* :mod:`namm.bench.report`: tables, JSON and the plot.
"""

from namm.bench.run import BenchConfig, BenchResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "run_bench"]
