"""The merging-at-scale study (issue 8): merge N experts with each method over random expert subsets, per base kind,
and report held-in scores normalized by the experts' and held-out scores normalized by the base's."""
