"""`python -m duosparse.analysis.spinnaker2`: the calibration and sensitivity tables of
docs/spinnaker2.md."""

from . import markdown_report

print(markdown_report())
