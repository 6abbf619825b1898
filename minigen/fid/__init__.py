"""FID, KID, IS and PSNR/SSIM as pytorch-fid and torch-fidelity compute them: `inception` (the FID Inception v3 with
pytorch-fid's weights), `features` (images to pool3 features and logits, resized as pytorch-fid does), `metrics` (the
scores from features). Imports only the shared top-level modules.
"""
