"""LoRA and its family, on any model of Linear and Conv2d layers: `layers` (trainable adapters, merging, fusing a
change into a weight), `formats` (one layer of a file in any LoRA-family format: its change to a weight),
`applying` (a file's layers on a model). Knows no model: the names of Stable Diffusion's layers in files are
`minigen.sd`'s. Imports nothing of minigen's outside this package.
"""
