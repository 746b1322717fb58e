"""Neuromorphic mapping of the toolkit's EBMs (docs/hardware.md).

    mapping      Network -> LavaProgram: float, or fixed point with 8-bit weights and per-layer exponents; refusals
    program      LavaProgram (numpy only) and the numpy simulator of the Lava graph, step for step
    layered_mapping, layered_program, conv_ops   convolutional (layered) networks: conv as Sparse (or Conv) processes
                 and their transposes, average pooling folded into the weights, max pooling refused
    lava_processes/  the Lava Processes and ProcessModels (no side effects: Lava executes these files)
    lava_run     build the Lava 0.10 graph and run a dataset through it
    lava_file    the export file (ebm-lava-program), loadable with h5py alone
    cost_model   Loihi operation counts, energy and latency ESTIMATES from a cited, replaceable table
    timing, targets, evaluate, commands   measuring across targets and ``ebm hardware ...``
    lava_compat  the lava-nc 0.10 fixes for Python 3.11, applied at install time

Importing this package imports neither Lava nor torch.
"""
