"""Metrics: FID of samples (`fid`); the inpainting metrics PSNR, hole PSNR, SSIM (`quality`) and LPIPS (`lpips`), and
the bundle aid reports of them (`bundle`); KID (`realism`)."""
