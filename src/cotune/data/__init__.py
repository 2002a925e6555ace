"""cotune.data"""
