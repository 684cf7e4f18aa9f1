"""The `judges` stage: reward models the policy never trains against, for an honest verdict."""
