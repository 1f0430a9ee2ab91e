"""Metrics: FID of samples (`fid`), and the inpainting metrics PSNR / hole PSNR / SSIM (`quality`) and LPIPS (`lpips`)."""
