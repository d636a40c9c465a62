"""fastvision benchmarks: `python -m benchmarks.micro`, `python -m benchmarks.models`, `benchmarks/gpu_suite.sh`."""
