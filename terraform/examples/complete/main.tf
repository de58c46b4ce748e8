provider "aws" {
  region = var.region
}

# Build side: CI on the main branch may encrypt names under web/, and nothing else.
module "encryptor" {
  source = "../../modules/encryptor-role"

  name                        = "${var.name}-ci"
  kms_key_arn                 = module.kms_key.key_arn
  secret_name_prefix          = var.secret_name_prefix
  github_repository           = var.github_repository
  github_branches             = ["main"]
  github_environments         = var.github_environments
  create_github_oidc_provider = var.create_github_oidc_provider
  tags                        = var.tags
}

# Host side: web hosts may decrypt web/ names only, and never encrypt.
module "web_hosts" {
  source = "../../modules/resolver-host"

  name                 = "${var.name}-web"
  kms_key_arn          = module.kms_key.key_arn
  allowed_secret_names = ["${var.secret_name_prefix}/*"]
  image_id             = var.image_id
  security_group_ids   = var.security_group_ids
  kmskeys_wheel        = var.kmskeys_wheel
  kmskeys_wheel_sha256 = var.kmskeys_wheel_sha256
  enable_seal          = var.enable_seal
  seal_key_arn         = module.kms_key.seal_key_arn
  tags                 = var.tags
}

# The key: its policy repeats both bindings, so an IAM policy elsewhere cannot widen them.
module "kms_key" {
  source = "../../modules/kms-key"

  alias_name               = "alias/${var.name}"
  encryptor_principal_arns = [module.encryptor.role_arn]
  decryptor_principal_arns = [module.web_hosts.role_arn]
  encrypt_name_patterns    = ["${var.secret_name_prefix}/*"]
  decrypt_name_patterns    = ["${var.secret_name_prefix}/*"]
  create_seal_key          = var.enable_seal
  sealer_principal_arns    = var.enable_seal ? [module.web_hosts.role_arn] : []
  tags                     = var.tags
}
