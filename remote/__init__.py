"""vims.remote"""
