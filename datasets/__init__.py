"""vims.datasets"""
