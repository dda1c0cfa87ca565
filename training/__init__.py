"""vims.training"""
