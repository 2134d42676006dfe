"""Facts about the Kaggle data and the synthetic set that command-line help names: no imports, so a
command's --help does not wait for pandas, OpenCV or SciPy."""

# Case-days whose annotations are known to be wrong in the competition data (found by many teams and
# discussed on the competition's forum): training or scoring on them measures the labels, not the model.
KNOWN_MISLABELLED = ("case7_day0", "case81_day30")
MAX_DAYS = 5  # days per case in the synthetic set
DIFFICULTIES = ("standard", "hard")  # of the synthetic set
