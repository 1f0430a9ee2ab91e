"""Metrics: FID of samples (`fid`); the inpainting metrics PSNR, hole PSNR, SSIM (`quality`) and LPIPS (`lpips`)."""
