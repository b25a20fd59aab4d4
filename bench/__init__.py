"""thyrobench: a benchmark harness for multi-task learning on thyroid ultrasound."""

__version__ = "0.1.0"
