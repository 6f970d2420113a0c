"""consumers/"""
