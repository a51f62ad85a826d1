"""The last stage: every tokenizer and prior measured side by side (`evaluation.run.run_evaluation`), and
the report (`evaluation.report.write_report`). Metrics beyond PSNR/SSIM live here: Fréchet statistics, the
Inception port and the dataset classifier. The package imports nothing itself, so a script that only needs
the experiment schema (`evaluation.schema`) does not load the metrics and plotting stack."""
