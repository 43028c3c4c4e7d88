"""The embedded tiny model: synthetic world, judge, training and evaluation."""
