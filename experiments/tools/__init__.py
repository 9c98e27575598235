"""Tools over the runner's results and models, apart from the training path:

  figures.py        training curves and the paper's Fig. 3 from a workdir
                    (launch/plot.py)
  model_summary.py  parameters and FLOPs per example of a config's model
                    (launch/summary.py, launch/reproduce.py)
  flops.py          the paper's FLOP count of a jaxpr (multiply and add
                    counted as two operations), split per Haiku module

The runner (experiments/train.py) uses flops.py for its static facts; nothing
here is needed to train.
"""
