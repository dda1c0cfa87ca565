"""vims.models"""
