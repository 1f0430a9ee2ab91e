"""Sample-quality metrics (FID: `aid_cli.metrics.fid`)."""
