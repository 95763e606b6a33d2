"""`python -m advarm`: the version, and which SSM backends can run here (and why not)."""
import advarm
from advarm.kernels import report

print(f"advarm {advarm.__version__}")
report()
