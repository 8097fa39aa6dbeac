"""dclr-dist: distributed DCLR pretraining (Ding, Qian, Xiong, ACM MM 2022, arXiv 2207.05340)."""

__version__ = "0.1.0"
