provider "aws" {
  region = var.region
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# The key of the secret and the parameter. Not the kmskeys key: that one's policy refuses any
# use without a kmskeys_name in the encryption context, which Secrets Manager never sends.
data "aws_iam_policy_document" "secrets_key" {
  #checkov:skip=CKV_AWS_109:A key policy's root statement with kms:* hands the key's use to IAM policies in this account; the host role's own policy then limits it to Decrypt through Secrets Manager and Parameter Store.
  #checkov:skip=CKV_AWS_111:In a key policy Resource "*" means this key; the principal is the account, whose IAM policies decide.
  #checkov:skip=CKV_AWS_356:In a key policy Resource "*" means this key: a key policy cannot name any other resource.
  statement {
    sid       = "AccountUsesIamPolicies"
    effect    = "Allow"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
}

resource "aws_kms_key" "secrets" {
  description             = "kmskeys sources example: the secret and the parameter"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  policy                  = data.aws_iam_policy_document.secrets_key.json
  tags                    = var.tags
}

resource "aws_kms_alias" "secrets" {
  name          = "alias/${var.name}-secrets"
  target_key_id = aws_kms_key.secrets.key_id
}

resource "aws_secretsmanager_secret" "db" {
  #checkov:skip=CKV2_AWS_57:Rotation is yours to configure (a rotation function or managed rotation); module.rotation makes every host follow it.
  name                    = "${var.name}/db"
  description             = "kmskeys sources example: served on the hosts as sm:${var.name}/db"
  kms_key_id              = aws_kms_key.secrets.arn
  recovery_window_in_days = var.secret_recovery_window_in_days
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "db" {
  secret_id     = aws_secretsmanager_secret.db.id
  secret_string = jsonencode({ username = "app", password = var.db_password })

  # Rotation owns the value after the first one.
  lifecycle {
    ignore_changes = [secret_string]
  }
}

resource "aws_ssm_parameter" "db_password" {
  name        = "/${var.name}/db/password"
  description = "kmskeys sources example: served on the hosts as ssm:${var.name}/db/password"
  type        = "SecureString"
  key_id      = aws_kms_key.secrets.arn
  value       = var.db_password
  tags        = var.tags

  lifecycle {
    ignore_changes = [value]
  }
}

# The kmskeys key for blobs: the hosts serve all three sources.
module "kms_key" {
  source = "../../modules/kms-key"

  alias_name               = "alias/${var.name}"
  decryptor_principal_arns = [module.hosts.role_arn]
  tags                     = var.tags
}

# The hosts read this secret and this parameter, and nothing else; the SSM Agent receives the
# rotation's flush.
module "hosts" {
  source = "../../modules/resolver-host"

  name                        = "${var.name}-hosts"
  kms_key_arn                 = module.kms_key.key_arn
  secretsmanager_secret_names = [aws_secretsmanager_secret.db.name]
  ssm_parameter_names         = [aws_ssm_parameter.db_password.name]
  secrets_kms_key_arns        = [aws_kms_key.secrets.arn]
  enable_ssm_agent            = true
  create_launch_template      = var.image_id != null && var.kmskeys_wheel != null
  image_id                    = var.image_id
  kmskeys_wheel               = var.kmskeys_wheel
  tags                        = merge(var.tags, { (var.fleet_tag_key) = var.fleet_tag_value })
}

# A rotation of the secret, a change of the parameter or a kmskeys Flush Request flushes the
# name on every tagged host, max_concurrency hosts at a time.
module "rotation" {
  source = "../../modules/fleet-rotation"

  name                    = var.name
  target_tag_key          = var.fleet_tag_key
  target_tag_value        = var.fleet_tag_value
  kmskeys_path            = var.kmskeys_path
  max_concurrency         = var.max_concurrency
  secret_name_prefixes    = ["${var.name}/"]
  parameter_name_prefixes = ["/${var.name}/"]
  tags                    = var.tags
}
