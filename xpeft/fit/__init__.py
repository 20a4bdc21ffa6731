"""Fitting, without Ray: the one fit loop (and its hooks) every fit uses, a profile's fit, the §3.1 warm
starts, a task's fit with its official metric, checkpoints and measured recipes."""
