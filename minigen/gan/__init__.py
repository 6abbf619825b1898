"""The DCGAN (Radford et al. 2016) of seed 002 and what trains it: `dcgan` (the generator, the discriminator, the
losses), `augment` (DiffAugment, Zhao et al. 2020), `config` (a run's settings), `data` (an image folder as tensors),
`trainer` (the loop, checkpoints, exact resume), `parallel` (the same run under torchrun), `fid` (FID of samples during
training). Imports the shared top-level modules and `minigen.fid`; nothing imports it but the CLIs.
"""
