
s-1@dbe3b688fc89d5b61d4ed8573890163192d55014df189783490a7efe1eab6e15"Ž# A study manifest: what to train, on which data, with whom, and how.
# Create it with: medfl study create --manifest manifest.toml --profile admin/profile.toml
# The manifest is content-addressed (SHA-256 of its canonical form); sites approve hashes.
name = "breast-cancer-logreg"
description = "Malignancy from the 30 WDBC nucleus features"
rounds = 15
seed = 42

[model]
kind = "logistic_regression"   # or "mlp" with hidden = [16]
hidden = []

[data]
dataset = "breast_cancer"      # the name sites register the dataset under
label = "malignant"            # binary label column (0/1)
features = [
  "radius_mean",
  "texture_mean",
  "perimeter_mean",
  "area_mean",
  "smoothness_mean",
  "compactness_mean",
  "concavity_mean",
  "concave_points_mean",
  "symmetry_mean",
  "fractal_dimension_mean",
  "radius_se",
  "texture_se",
  "perimeter_se",
  "area_se",
  "smoothness_se",
  "compactness_se",
  "concavity_se",
  "concave_points_se",
  "symmetry_se",
  "fractal_dimension_se",
  "radius_worst",
  "texture_worst",
  "perimeter_worst",
  "area_worst",
  "smoothness_worst",
  "compactness_worst",
  "concavity_worst",
  "concave_points_worst",
  "symmetry_worst",
  "fractal_dimension_worst",
]

[selection]
sites = []                     # empty: every registered site with the dataset
fraction = 1.0                 # share of eligible connected sites sampled each round
min_sites = 3                  # quorum: fewest updates a round needs to commit
round_deadline_secs = 120      # a selected site's time to deliver its update
max_attempts = 3               # attempts at one round before the study fails

[training]
local_epochs = 2
batch_size = 32
learning_rate = 0.05
optimizer = "adam"             # or "sgd"

[strategy]
kind = "fed_avg"
weighting = "examples"         # or "uniform"
(€Ðß´«30:N
 
hospital-a
hospital-b
hospital-c (0R š™™™™™©?"adam